"""The model layer: CLIP through open_clip, zero-shot heads, the classifier, ViT options, CAMs.

Typical use::

    bundle = load_clip("ViT-B-32", "openai")              # offline; "none" = random init
    classifier = build_zeroshot_classifier(bundle, "imagenet", "openai_imagenet")
    top1, probs = predict(classifier, pil_images, batch_size=64)
    cams = compute_cam(classifier, images, labels, kind="mmcam")
    save_classifier(classifier, run_dir, model_name=bundle.name, pretrained=bundle.pretrained,
                    classnames=names, templates=templates)

Importing this package registers the tiny test architecture ``robustft-tiny`` with open_clip.
"""

from robustft.model.cam import CAM_KINDS, CamResult, cam_from_forward, compute_cam
from robustft.model.classifier import ClassifierHead, ImageClassifier, build_zeroshot_classifier, predict
from robustft.model.clip import TINY_ARCH, ClipBundle, list_architectures, load_clip
from robustft.model.prompts import CLASSNAME_SETS, TEMPLATE_SETS, load_classnames, load_templates
from robustft.model.serialization import load_classifier, save_classifier
from robustft.model.transforms import PreprocessCfg, build_eval_transform
from robustft.model.vit import VitOutput
from robustft.model.zeroshot import build_zeroshot_weights

__all__ = [
    "CAM_KINDS",
    "CLASSNAME_SETS",
    "TEMPLATE_SETS",
    "TINY_ARCH",
    "CamResult",
    "ClassifierHead",
    "ClipBundle",
    "ImageClassifier",
    "PreprocessCfg",
    "VitOutput",
    "build_eval_transform",
    "build_zeroshot_classifier",
    "build_zeroshot_weights",
    "cam_from_forward",
    "compute_cam",
    "list_architectures",
    "load_classifier",
    "load_classnames",
    "load_clip",
    "load_templates",
    "predict",
    "save_classifier",
]
