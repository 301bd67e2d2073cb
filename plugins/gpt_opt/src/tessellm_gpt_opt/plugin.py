from tessellm import hookimpl


@hookimpl
def register_models(register):
    register("GPT2LMHeadModel", "tessellm_gpt_opt.gpt2:GPT2LMHeadModel")
    register("OPTForCausalLM", "tessellm_gpt_opt.opt:OPTForCausalLM")
