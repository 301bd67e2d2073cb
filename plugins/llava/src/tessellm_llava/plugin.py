from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.1,<2"


@hookimpl
def register_models(register):
    register("LlavaForConditionalGeneration", "tessellm_llava.model:LlavaForConditionalGeneration")
