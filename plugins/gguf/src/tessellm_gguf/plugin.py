from tessellm import hookimpl


@hookimpl
def register_weight_formats(register):
    register("gguf", "tessellm_gguf.format:GGUFFormat")
