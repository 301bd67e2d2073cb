from tessellm import hookimpl
from tessellm.hookspecs import Register

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_models(register: Register) -> None:
    register("MistralForCausalLM", "tessellm_mistral.model:MistralForCausalLM")
    register("MixtralForCausalLM", "tessellm_mistral.model:MixtralForCausalLM")
