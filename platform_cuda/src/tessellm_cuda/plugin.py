from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_platforms(register):
    register("cuda", "tessellm_cuda.platform:CudaPlatform")


@hookimpl
def register_quantization_methods(register):
    # Dense weights; one-row products on a Triton GEMV (the default here in bf16/fp16).
    register("unquantized_gemv", "tessellm_triton_kernels.dense_gemv:UnquantizedGemv")
