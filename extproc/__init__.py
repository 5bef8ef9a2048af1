"""extproc: budget enforcement for LLM inference traffic behind Envoy ext_proc.

The public surface is small: the CLI (`extproc.cli`), the policy model
(`extproc.policy`), the budget engine (`extproc.engine`) and the store
interface (`extproc.stores.base`). Everything else is internal.
"""

__version__ = "0.1.0"
