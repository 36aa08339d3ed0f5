"""The VCT nodes: thin ComfyUI glue around `vct_ops`. Reached only as `<pack>.nodes`."""
from comfy_api.latest import ComfyExtension, io

from .concept_nodes import VCTConceptLearn, VCTConceptPrompt
from .inversion_file_nodes import VCTLoadInversion, VCTSaveInversion
from .inversion_nodes import VCTDDIMInvert, VCTNullTextInvert
from .sampler_node import VCTDualBranchSampler

NODES = [VCTDDIMInvert, VCTNullTextInvert, VCTConceptLearn, VCTConceptPrompt, VCTDualBranchSampler, VCTSaveInversion,
         VCTLoadInversion]


class VCTExtension(ComfyExtension):
    """Lists the pack's nodes for ComfyUI."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """Return the node classes this pack registers."""
        return list(NODES)


async def comfy_entrypoint() -> VCTExtension:
    """Return the extension ComfyUI loads."""
    return VCTExtension()
