"""``train.report_to``: the HF Trainer integrations loratune accepts, and whether each is installed."""

from __future__ import annotations

# train.report_to: the HF Trainer's integrations and the module each needs (the pip package of the same name,
# except where REPORT_PACKAGES says otherwise).
REPORT_TO = {
    "none": None,
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "neptune": "neptune",
    "trackio": "trackio",
    "swanlab": "swanlab",
    "codecarbon": "codecarbon",
    "azure_ml": "azureml",
}
REPORT_PACKAGES = {"azureml": "azureml-core", "comet_ml": "comet-ml"}


def report_to_list(value: str) -> list[str]:
    """``train.report_to`` as the Trainer's list of integrations ([] for none)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    return [] if names in ([], ["none"]) else names


def report_to_problems(value: str) -> list[str]:
    """Unknown or not installed ``train.report_to`` integrations, one sentence each (with the pip command)."""
    import importlib.util

    problems = []
    for name in report_to_list(value):
        module = REPORT_TO.get(name, "")
        if name not in REPORT_TO or module is None:
            known = ", ".join(REPORT_TO)
            problems.append(f"train.report_to={name!r} is not a Trainer integration loratune knows (one of {known})")
        elif importlib.util.find_spec(module) is None:
            package = REPORT_PACKAGES.get(module, module)
            problems.append(f"train.report_to={name} needs the {package} package, which is not installed: pip install {package}")
    return problems
