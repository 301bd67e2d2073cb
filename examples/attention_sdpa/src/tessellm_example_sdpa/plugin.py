"""The plugin module: tessellm finds it through the ``tessellm`` entry point group."""

from tessellm import hookimpl

# The plugin API versions this package is written for; tessellm refuses it outside them.
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_attention_backends(register):
    # A string target: the backend module is imported only when an engine chooses it.
    register("sdpa", "tessellm_example_sdpa.backend:SdpaPagedAttention")
