"""PyTorch models of the zoo: modules, training, and export with the dynamo ONNX exporter.

Every module's ``forward`` is exactly the graph that is served: standardisation of inputs and
de-standardisation of regression targets are buffers inside the module, classifiers return
``(label, probabilities)``, and stochastic parts (VAE sampling) stay out of the exported graphs.
"""

from __future__ import annotations

from collections.abc import Callable

from ..spec import BuildContext, Trained
from .classifiers import Classifier
from .cnn import DigitsCNN, digits_cnn
from .common import Standardize, export_module, mlp, torch_reference
from .forecast import sunspots_gru, sunspots_lstm
from .generative import (
    VAE,
    ConditionalGenerator,
    DenoisingAutoencoder,
    digits_autoencoder,
    digits_gan,
    digits_vae_decoder,
    digits_vae_encoder,
)
from .language import news_minilm, text_minilm
from .tabular import (
    TabularRegressor,
    breast_cancer_logreg,
    diabetes_linear,
    diabetes_mlp,
    digits_logreg,
    digits_mlp,
)

__all__ = [
    "export_module",
    "torch_reference",
    "mlp",
    "Standardize",
    "TabularRegressor",
    "Classifier",
    "DigitsCNN",
    "DenoisingAutoencoder",
    "VAE",
    "ConditionalGenerator",
    "TRAINERS",
]

#: name -> trainer, in the order the zoo lists them
TRAINERS: dict[str, Callable[[BuildContext], Trained]] = {
    "diabetes-linear": diabetes_linear,
    "diabetes-mlp": diabetes_mlp,
    "breast-cancer-logreg": breast_cancer_logreg,
    "digits-logreg": digits_logreg,
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "digits-autoencoder": digits_autoencoder,
    "digits-vae-encoder": digits_vae_encoder,
    "digits-vae-decoder": digits_vae_decoder,
    "digits-gan": digits_gan,
    "sunspots-lstm": sunspots_lstm,
    "sunspots-gru": sunspots_gru,
    "text-minilm": text_minilm,
    "news-minilm": news_minilm,
}
