"""Zero-shot classification: class names x prompt templates -> classifier weights; images -> top-k labels.

The classifier is the prompt ensemble of the CLIP paper (section 3.1.4): each template is filled in with a
class name, the texts are embedded and L2-normalised, and a class's weight is the mean of its templates'
embeddings, renormalised. Weights are ``[E, C]`` (embedding width x classes), the orientation of OpenAI's
notebook, so that ``logits = logit_scale.exp() * image_embeddings @ weights`` and probabilities are their
softmax over classes.

Texts go through `clipforge.embed.embed_texts` and images through `clipforge.embed.embed_images`: the same
batching, precision and preprocessing as every other consumer of embeddings.

Template sets ship as data files under ``configs/prompts/`` (one template per line, ``{}`` where the class
name goes, ``#`` comment lines and blank lines ignored); a user file in the same format works the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .embed import ImageItem, embed_images, embed_texts

# Named template sets -> file under configs/prompts/.
TEMPLATE_SETS = {"openai": "openai_imagenet.txt", "simple": "simple.txt", "seeds": "seeds.txt"}
PLACEHOLDER = "{}"


# ---------------------------------------------------------------------------------------------- templates


def load_templates(name_or_path: str | Path) -> list[str]:
    """Templates of a shipped set (``openai``: OpenAI's 80 ImageNet templates, ``simple``: their 7-template
    subset, ``seeds``: three plain photo prompts) or of a text file with one template per line."""
    name = str(name_or_path)
    if name in TEMPLATE_SETS and not isinstance(name_or_path, Path):
        data = resources.files("clipforge") / "configs" / "prompts" / TEMPLATE_SETS[name]
        return parse_templates(data.read_text(encoding="utf-8"), f"template set {name!r}")
    path = Path(name).expanduser()
    if not path.is_file():
        hint = "no such file" if not path.exists() else "not a file"
        raise ValueError(f"templates {name!r}: {hint}; give one of {', '.join(TEMPLATE_SETS)} or a text file "
                         f"with one template per line containing {PLACEHOLDER}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    return parse_templates(text, str(path))


def parse_templates(text: str, source: str = "<templates>") -> list[str]:
    """Templates from text: one per line, each with ``{}``; blank lines and ``#`` comments are skipped."""
    templates = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if PLACEHOLDER not in line:
            raise ValueError(f"{source}, line {number}: template {line!r} has no {PLACEHOLDER} where the class "
                             f"name goes (write e.g. 'a photo of a {PLACEHOLDER}.')")
        templates.append(line)
    if not templates:
        raise ValueError(f"{source}: no templates (one per line, each with {PLACEHOLDER} for the class name)")
    return templates


# ------------------------------------------------------------------------------------------- class names


def parse_classnames(text: str, source: str = "--classes") -> list[str]:
    """Class names from a comma-separated string (``"cat,dog,car"``); surrounding spaces are dropped."""
    names = [name.strip() for name in text.split(",")]
    return _checked_classnames([(i + 1, name) for i, name in enumerate(names) if name], source, "entry")


def read_classnames(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (blank lines skipped; a name may contain commas)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"classes file {str(path)!r}: no such file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return _checked_classnames(numbered, str(path), "line")


def _checked_classnames(numbered: list[tuple[int, str]], source: str, unit: str) -> list[str]:
    """The names, or a ValueError for none at all or a repeated name (its label would be ambiguous)."""
    if not numbered:
        raise ValueError(f"{source}: no class names given")
    first_seen: dict[str, int] = {}
    for number, name in numbered:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{source}, {unit} {number}: a class name must be non-empty text, got {name!r}")
        if name in first_seen:
            raise ValueError(f"{source}, {unit} {number}: class {name!r} repeats {unit} {first_seen[name]}; "
                             "give each class once")
        first_seen[name] = number
    return [name for _, name in numbered]


# ------------------------------------------------------------------------------------------ classifier


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Texts class-major: all templates of class 0, then of class 1, ... (``str.replace``, so other braces
    in a template are kept literally)."""
    return [template.replace(PLACEHOLDER, name) for name in classnames for template in templates]


def zero_shot_classifier(
    model,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Class weights ``[E, C]`` (fp32, CPU, unit columns): per class, the renormalised mean of the normalised
    text embeddings of all its templates."""
    if isinstance(classnames, str) or isinstance(templates, str):
        raise TypeError("classnames and templates are lists of strings, not one string")
    classnames = _checked_classnames(list(enumerate(classnames, start=1)), "classnames", "entry")
    if not templates:
        raise ValueError("templates: empty list; give at least one template with {}")
    missing = [t for t in templates if PLACEHOLDER not in t]
    if missing:
        raise ValueError(f"templates: {missing[0]!r} has no {PLACEHOLDER} where the class name goes")
    texts = fill_templates(classnames, templates)
    embeddings = embed_texts(model, texts, tokenizer, batch_size=batch_size, normalize=True, progress=progress,
                             desc="embedding class prompts")
    per_class = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T.contiguous()


# ------------------------------------------------------------------------------------------ classify


@dataclass
class Prediction:
    """Top-k labels of one image, best first, with their probabilities (over all classes)."""

    index: int  # position in the input
    labels: list[str]
    probs: list[float]


@dataclass
class ClassifyResult:
    """Predictions for the images that decoded (input order) and why the others did not."""

    predictions: list[Prediction]
    probs: torch.Tensor  # [N_ok, C] probabilities of every class, rows in the order of `predictions`
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (input index, item, reason)


def class_probabilities(image_embeddings: torch.Tensor, classifier: torch.Tensor,
                        logit_scale: float | torch.Tensor) -> torch.Tensor:
    """``softmax(logit_scale.exp() * images @ classifier)`` over classes: ``[N, E] x [E, C] -> [N, C]``.
    `logit_scale` is the model's parameter (a log), as in CLIP."""
    scale = torch.as_tensor(logit_scale, dtype=torch.float32).exp()
    return (scale * image_embeddings.float() @ classifier.float()).softmax(dim=-1)


def classify(
    model,
    preprocess: Callable[[Image.Image], torch.Tensor],
    images: Sequence[ImageItem],
    classifier: torch.Tensor,
    classnames: Sequence[str],
    top_k: int = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> ClassifyResult:
    """Top-k labels of each image (paths, bytes or PIL images). Images that cannot be read are reported in
    ``failures``, not raised. `classifier` comes from `zero_shot_classifier` (``[E, C]``); `top_k` is
    capped at the number of classes."""
    _check_classifier(classifier, classnames, model)
    _check_top_k(top_k)
    embedded = embed_images(model, images, preprocess, batch_size=batch_size, num_workers=num_workers,
                            normalize=True, progress=progress, desc="classifying images")
    probs = class_probabilities(embedded.embeddings, classifier, model.logit_scale.detach().float().cpu())
    predictions = [Prediction(index, labels, values)
                   for index, (labels, values) in zip(embedded.indices, top_classes(probs, classnames, top_k),
                                                      strict=True)]
    return ClassifyResult(predictions, probs, embedded.failures)


def top_classes(probs: torch.Tensor, classnames: Sequence[str], top_k: int) -> list[tuple[list[str], list[float]]]:
    """For each row of `probs` (``[N, C]``, as `class_probabilities` gives), the `top_k` class names (capped at the
    number of classes) with their probabilities, best first."""
    _check_top_k(top_k)
    best, order = probs.topk(min(top_k, len(classnames)), dim=-1)
    return [([classnames[c] for c in row], values) for row, values in zip(order.tolist(), best.tolist(), strict=True)]


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")


def _check_classifier(classifier: torch.Tensor, classnames: Sequence[str], model) -> None:
    width = model.embed_dim
    if classifier.ndim != 2 or classifier.shape != (width, len(classnames)):
        raise ValueError(f"classifier must be [embedding width {width}, classes {len(classnames)}] as returned "
                         f"by zero_shot_classifier, got {tuple(classifier.shape)}")


__all__ = ["TEMPLATE_SETS", "ClassifyResult", "Prediction", "class_probabilities", "classify", "fill_templates",
           "load_templates", "parse_classnames", "parse_templates", "read_classnames", "top_classes",
           "zero_shot_classifier"]
