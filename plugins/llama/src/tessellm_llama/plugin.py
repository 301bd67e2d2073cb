from tessellm import hookimpl


@hookimpl
def register_models(register):
    register("LlamaForCausalLM", "tessellm_llama.model:LlamaForCausalLM")
