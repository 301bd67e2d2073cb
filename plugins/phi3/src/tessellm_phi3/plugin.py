from tessellm import hookimpl


@hookimpl
def register_models(register):
    register("Phi3ForCausalLM", "tessellm_phi3.model:Phi3ForCausalLM")
