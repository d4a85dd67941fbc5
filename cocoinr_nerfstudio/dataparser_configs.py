"""nerfstudio entry point ``idr-data`` (see pyproject).

nerfstudio imports this from inside ``nerfstudio.configs.dataparser_configs`` for every ``ns-*``
command: it must stay cheap and must not import that module or anything importing it.
"""

from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from cocoinr_nerfstudio.data.idr_dataparser import IDRDataParserConfig

idr_data = DataParserSpecification(
    config=IDRDataParserConfig(),
    description="IDR/VolSDF scenes (DTU, BlendedMVS, H3DS, new data) with CoCo-INR's few-view splits and masks.",
)
