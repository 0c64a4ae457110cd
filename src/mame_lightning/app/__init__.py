"""One browser GUI for every generation mode: text-to-image, lesion inpainting and the full flow.

    python -m mame_lightning.app model.text2image=T2I_EXPORT_DIR model.inpaint=INPAINT_EXPORT_DIR

The tabs call the same pipeline functions as `python -m mame_lightning.generate`; the models are
loaded once at start and shared by every request. Settings: conf/app.yaml.
"""

import os

# Gradio reads this when it is imported: no usage reports and no version check leave the machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

__all__: list[str] = []
