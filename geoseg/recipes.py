"""``python -m geoseg.recipes [NAME ...]``: rebuild the bundled models and print their scores.

The command README, DESIGN and the bundled models' cards name. This is the one shim kept by
the "one house" layout: the recipes live in :mod:`geoseg.train.recipes` (the table, building)
and :mod:`geoseg.train.folds` (leave-one-place-out scoring); this module only runs
:func:`geoseg.train.recipes.main` and defines nothing else.
"""

if __name__ == "__main__":  # pragma: no cover - run by hand to rebuild the bundled models
    import sys

    from geoseg.train.recipes import main

    main(sys.argv[1:])
