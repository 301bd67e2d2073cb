from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_models(register):
    register("Phi3ForCausalLM", "tessellm_phi3.model:Phi3ForCausalLM")
