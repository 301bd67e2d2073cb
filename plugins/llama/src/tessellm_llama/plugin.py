from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.1,<2"


@hookimpl
def register_models(register):
    register("LlamaForCausalLM", "tessellm_llama.model:LlamaForCausalLM")


@hookimpl
def register_tool_call_parsers(register) -> None:
    register("llama3_json", "tessellm_llama.tool_parser:Llama3JsonToolParser")
