from tessellm import hookimpl
from tessellm.hookspecs import Register


@hookimpl
def register_models(register: Register) -> None:
    register("MistralForCausalLM", "tessellm_mistral.model:MistralForCausalLM")
    register("MixtralForCausalLM", "tessellm_mistral.model:MixtralForCausalLM")
