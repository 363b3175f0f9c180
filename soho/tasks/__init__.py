"""Tasks, registered by name (:mod:`soho.tasks.base`): importing this package registers the built-in ones."""
from soho.tasks.base import TASKS, RunConfig, StepOutput, Task, get_task, load_run_config, register_task
from soho.tasks.classification import ClassificationTask
from soho.tasks.finetuning import FinetuneConfig, FinetuneDataConfig, FinetuneTask, InitConfig
from soho.tasks.nlvr2 import NLVR2Task
from soho.tasks.pretraining import PretrainConfig, PretrainingTask
from soho.tasks.retrieval import RetrievalConfig, RetrievalTask
from soho.tasks.ve import VisualEntailmentTask
from soho.tasks.vqa import VQAConfig, VQATask

__all__ = [
    "TASKS", "RunConfig", "StepOutput", "Task", "get_task", "load_run_config", "register_task", "FinetuneConfig",
    "FinetuneDataConfig", "FinetuneTask", "InitConfig", "PretrainConfig", "PretrainingTask", "ClassificationTask",
    "NLVR2Task", "RetrievalConfig", "RetrievalTask", "VisualEntailmentTask", "VQAConfig", "VQATask",
]
