from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.2,<2"


@hookimpl
def register_speculative_proposers(register):
    register("eagle", "tessellm_spec_eagle.proposer:EagleProposer")
