from tessellm import hookimpl
from tessellm.hookspecs import Register

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.1,<2"


@hookimpl
def register_models(register: Register) -> None:
    register("MistralForCausalLM", "tessellm_mistral.model:MistralForCausalLM")
    register("MixtralForCausalLM", "tessellm_mistral.model:MixtralForCausalLM")


@hookimpl
def register_tool_call_parsers(register: Register) -> None:
    register("mistral", "tessellm_mistral.tool_parser:MistralToolParser")
