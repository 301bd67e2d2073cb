from tessellm import hookimpl


@hookimpl
def register_platforms(register):
    register("rocm", "tessellm_rocm.platform:RocmPlatform")
