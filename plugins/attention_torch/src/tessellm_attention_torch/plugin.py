from tessellm import hookimpl


@hookimpl
def register_attention_backends(register):
    register("torch", "tessellm_attention_torch.backend:TorchPagedAttention")
