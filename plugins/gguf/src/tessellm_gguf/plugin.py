from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_weight_formats(register):
    register("gguf", "tessellm_gguf.format:GGUFFormat")


@hookimpl
def register_quantization_methods(register):
    register("gguf", "tessellm_gguf.method:GGUFNative")
