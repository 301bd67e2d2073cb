from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_models(register):
    register("GPT2LMHeadModel", "tessellm_gpt_opt.gpt2:GPT2LMHeadModel")
    register("OPTForCausalLM", "tessellm_gpt_opt.opt:OPTForCausalLM")
