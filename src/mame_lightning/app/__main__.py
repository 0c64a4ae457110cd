"""`python -m mame_lightning.app model.text2image=DIR model.inpaint=DIR [app.port=7860 ...]`"""

from mame_lightning.app.server import cli

if __name__ == "__main__":
    cli()
