"""Budget stores: one small async interface (`base.Store`), several backends.

Only `extproc.app` / `extproc.cli` pick a concrete store (`open_store`).
"""
