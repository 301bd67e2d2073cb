from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them):
TESSELLM_PLUGIN_API = ">=1.3,<2"  # per-layer cache specs and StatefulLayer came in 1.3


@hookimpl
def register_models(register):
    register("Mamba2ForCausalLM", "tessellm_mamba.model:Mamba2ForCausalLM")
    register("BambaForCausalLM", "tessellm_mamba.bamba:BambaForCausalLM")
