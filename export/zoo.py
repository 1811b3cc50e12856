"""The zoo: every model slimserve trains, exports and serves by default."""

from __future__ import annotations

from . import sklearn_zoo, torch_zoo
from .spec import ModelSpec

__all__ = ["SPECS", "spec", "plan"]

_T, _S = torch_zoo.TRAINERS, sklearn_zoo.TRAINERS

# (name, task, dataset, family, description, requires)
_TABLE: list[tuple[str, str, str, str, str, tuple[str, ...]]] = [
    (
        "diabetes-linear",
        "regression",
        "diabetes",
        "torch",
        "Linear regression of disease progression one year on",
        (),
    ),
    ("diabetes-mlp", "regression", "diabetes", "torch", "MLP regressor (10 -> 32 -> 16 -> 1)", ()),
    (
        "diabetes-poly-ridge",
        "regression",
        "diabetes",
        "sklearn",
        "Degree-2 polynomial features + ridge regression",
        (),
    ),
    ("diabetes-svr", "regression", "diabetes", "sklearn", "RBF support vector regression", ()),
    (
        "diabetes-random-forest",
        "regression",
        "diabetes",
        "sklearn",
        "Random forest regressor, 100 trees",
        (),
    ),
    ("digits-logreg", "classification", "digits", "torch", "Softmax (logistic) regression", ()),
    (
        "digits-mlp",
        "classification",
        "digits",
        "torch",
        "MLP classifier (64 -> 256 -> 128 -> 10)",
        (),
    ),
    ("digits-cnn", "classification", "digits", "torch", "ResNet-style CNN on 8x8 digit images", ()),
    (
        "breast-cancer-logreg",
        "classification",
        "breast-cancer",
        "torch",
        "Binary logistic regression (malignant / benign)",
        (),
    ),
    ("digits-svc", "classification", "digits", "sklearn", "RBF support vector classifier", ()),
    ("wine-decision-tree", "classification", "wine", "sklearn", "Decision tree", ()),
    (
        "breast-cancer-random-forest",
        "classification",
        "breast-cancer",
        "sklearn",
        "Random forest classifier, 100 trees",
        (),
    ),
    (
        "iris-knn",
        "classification",
        "iris",
        "sklearn",
        "k-nearest neighbours on standardised features",
        (),
    ),
    ("wine-gaussian-nb", "classification", "wine", "sklearn", "Gaussian naive Bayes", ()),
    (
        "digits-multinomial-nb",
        "classification",
        "digits",
        "sklearn",
        "Multinomial naive Bayes on pixel intensities",
        (),
    ),
    (
        "digits-bernoulli-nb",
        "classification",
        "digits",
        "sklearn",
        "Bernoulli naive Bayes on pixels binarised at 0.5",
        (),
    ),
    (
        "digits-autoencoder",
        "reconstruction",
        "digits",
        "torch",
        "Denoising autoencoder: reconstruction and a 16-d embedding",
        (),
    ),
    (
        "digits-vae-encoder",
        "encoding",
        "digits",
        "torch",
        "VAE encoder: mean and log-variance of the 8-d latent posterior",
        (),
    ),
    (
        "digits-vae-decoder",
        "generation",
        "digits",
        "torch",
        "VAE decoder: generates digits from 8-d latent vectors",
        ("digits-cnn",),
    ),
    (
        "digits-gan",
        "generation",
        "digits",
        "torch",
        "Class-conditional GAN, DCGAN-style generator: (noise, digit) -> image",
        ("digits-cnn",),
    ),
    ("digits-kmeans", "clustering", "digits", "sklearn", "k-means, k = 10", ()),
    ("digits-pca", "dimensionality_reduction", "digits", "sklearn", "PCA to 16 components", ()),
    (
        "sunspots-lstm",
        "forecasting",
        "sunspots",
        "torch",
        "LSTM forecaster of monthly sunspot numbers: any history in, the next 12 months out",
        (),
    ),
    (
        "sunspots-gru",
        "forecasting",
        "sunspots",
        "torch",
        "GRU forecaster of monthly sunspot numbers: any history in, the next 12 months out",
        (),
    ),
    (
        "text-minilm",
        "embedding",
        "20newsgroups",
        "torch",
        "all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm); text in, tokenized by the server",
        (),
    ),
    (
        "news-minilm",
        "classification",
        "20newsgroups",
        "torch",
        "20 Newsgroups topic classifier: frozen MiniLM embeddings + linear head; text in",
        (),
    ),
]

SPECS: dict[str, ModelSpec] = {
    name: ModelSpec(
        name, task, dataset, family, description, (_T if family == "torch" else _S)[name], requires
    )
    for name, task, dataset, family, description, requires in _TABLE
}


def spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(
            f"model {name!r} is not in the zoo; known models: {', '.join(SPECS)}"
        ) from None


def plan(only: list[str] | tuple[str, ...] = ()) -> list[ModelSpec]:
    """The specs to build, each after the models it requires (all when ``only`` is empty)."""
    wanted = [spec(n) for n in only] if only else list(SPECS.values())
    ordered: list[ModelSpec] = []

    def add(s: ModelSpec) -> None:
        for dep in s.requires:
            add(spec(dep))
        if s not in ordered:
            ordered.append(s)

    for s in wanted:
        add(s)
    return ordered
