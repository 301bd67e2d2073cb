from tessellm import hookimpl
from tessellm.hookspecs import Register


@hookimpl
def register_models(register: Register) -> None:
    register("Qwen2ForCausalLM", "tessellm_qwen.model:Qwen2ForCausalLM")
    register("Qwen3ForCausalLM", "tessellm_qwen.model:Qwen3ForCausalLM")
    register("Qwen3MoeForCausalLM", "tessellm_qwen.model:Qwen3MoeForCausalLM")
