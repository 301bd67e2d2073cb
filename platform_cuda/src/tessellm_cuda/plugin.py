from tessellm import hookimpl


@hookimpl
def register_platforms(register):
    register("cuda", "tessellm_cuda.platform:CudaPlatform")


@hookimpl
def register_quantization_methods(register):
    # Dense weights; one-row products on a Triton GEMV (the default here in bf16/fp16).
    register("unquantized_gemv", "tessellm_kernels_triton.dense_gemv:UnquantizedGemv")
