from tessellm import hookimpl


@hookimpl
def register_models(register):
    register("LlamaForCausalLM", "tessellm_llama.model:LlamaForCausalLM")
    # Mistral without a sliding window is a Llama; with one it needs the Mistral plugin's
    # window-aware attention, which this class also passes through when configured.
    register("MistralForCausalLM", "tessellm_llama.model:LlamaForCausalLM")
