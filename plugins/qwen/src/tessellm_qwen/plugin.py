from tessellm import hookimpl
from tessellm.hookspecs import Register

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_models(register: Register) -> None:
    register("Qwen2ForCausalLM", "tessellm_qwen.model:Qwen2ForCausalLM")
    register("Qwen3ForCausalLM", "tessellm_qwen.model:Qwen3ForCausalLM")
    register("Qwen3MoeForCausalLM", "tessellm_qwen.model:Qwen3MoeForCausalLM")
