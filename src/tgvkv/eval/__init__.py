"""Offline accuracy harness of tgvkv: what KV eviction costs a VLM in answer accuracy.

``tgvkv.eval.run(...)`` evaluates a Hugging Face VLM (default: the committed tiny LLaVA trained on
easy-VQA, ``tgvkv/data/tiny-llava-easyvqa``) on a VQA set under several eviction policies and keep
ratios; ``tgvkv.eval.format_table(result)`` renders the result. The committed subjects
(:data:`SUBJECTS`): ``tiny-llava-easyvqa`` (3 layers, 64 image tokens, dataset ``easy-vqa``) and
``tiny-llava-grid`` (8 layers, GQA, 256 image tokens, a system prompt before the image, dataset
``easy-vqa-grid``: questions about one cell of a 2x2 grid; trained by ``scripts/train_tiny_vlm.py
--task grid``; the default subject of ``tgvkv-bench accuracy``, :data:`DEFAULT_SUBJECT`). The
built-in datasets come from the ``easy-vqa`` package (the ``eval`` extra: ``pip install
"tgvkv[eval]"``; offline).
"""

from .baselines import POLICIES, make_policy, policy_class
from .datasets import load_dataset
from .harness import (DEFAULT_KEEP_RATIOS, DEFAULT_POLICIES, DEFAULT_SUBJECT, SUBJECTS,
                      default_model_path, format_table, load_model, run, subject_path)
from .metrics import anls, exact_match, extract_answer, normalize_answer, relaxed_accuracy, vqa_accuracy

__all__ = ["run", "format_table", "load_model", "default_model_path", "subject_path", "SUBJECTS",
           "DEFAULT_SUBJECT", "load_dataset",
           "make_policy", "policy_class", "POLICIES", "DEFAULT_POLICIES", "DEFAULT_KEEP_RATIOS",
           "exact_match", "vqa_accuracy", "anls", "relaxed_accuracy", "extract_answer",
           "normalize_answer"]
