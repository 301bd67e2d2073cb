from tessellm import hookimpl


@hookimpl
def register_platforms(register):
    register("cuda", "tessellm_cuda.platform:CudaPlatform")
