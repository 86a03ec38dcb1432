"""The RADIO vision config class a real checkpoint ships (see configuration.py)."""

from transformers.configuration_utils import PretrainedConfig


class RADIOConfig(PretrainedConfig):
    model_type = "radio"

    def __init__(self, args=None, version="radio_v2.5-h", patch_size=16, max_resolution=2048, **kwargs):
        self.args = args or {}
        self.version = version
        self.patch_size = patch_size
        self.max_resolution = max_resolution
        super().__init__(**kwargs)
