"""`python -m dreambooth_trainer.serve ...` == `dreambooth serve ...`."""

from .cli import serve

if __name__ == "__main__":
    serve(prog_name="dreambooth serve")
