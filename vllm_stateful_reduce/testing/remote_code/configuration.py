"""A checkpoint's own config class, shipped in the checkpoint folder as remote code.

Written here to behave like the real Nemotron Nano 12B v2 VL checkpoint's
`configuration.py` (as other engines' copies of it show): its own class name, the
vision config built from the class that `vision_config.auto_map` names (another
module in the folder), `llm_config` kept under that name, and none of the helpers the
plugin's own class adds (`tokens_per_frame`, `text_config`). Used by the recipe
checkpoint (`testing.checkpoint.build_recipe_checkpoint`), so `--trust-remote-code`
really loads remote code. Not imported by the package.
"""

from transformers import NemotronHConfig
from transformers.configuration_utils import PretrainedConfig

from .configuration_radio import RADIOConfig  # transformers copies a relative import along


class NemotronH_Nano_VL_V2_Config(PretrainedConfig):
    model_type = "NemotronH_Nano_VL_V2"
    is_composition = True

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        force_image_size=None,
        downsample_ratio=0.5,
        template=None,
        ps_version="v1",
        image_tag_type="internvl",
        projector_hidden_size=4096,
        vit_hidden_size=1280,
        video_pruning_rate=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if vision_config is not None:
            if vision_config["auto_map"]["AutoConfig"] != "configuration_radio.RADIOConfig":
                raise ValueError(f"unknown vision config class {vision_config['auto_map']}")
            self.vision_config = RADIOConfig(**vision_config)
        else:
            self.vision_config = PretrainedConfig()
        self.llm_config = NemotronHConfig(**llm_config) if llm_config is not None else NemotronHConfig()
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.ps_version = ps_version
        self.image_tag_type = image_tag_type
        self.projector_hidden_size = projector_hidden_size
        self.vit_hidden_size = vit_hidden_size
        self.video_pruning_rate = video_pruning_rate
