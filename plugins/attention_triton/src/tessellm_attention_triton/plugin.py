from tessellm import hookimpl


@hookimpl
def register_attention_backends(register):
    register("triton", "tessellm_attention_triton.backend:TritonPagedAttention")
