from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.1,<2"


@hookimpl
def register_structured_output_backends(register):
    register("llguidance", "tessellm_structured_llguidance.backend:LLGuidanceBackend")
