"""Fashion-MNIST 28x28 from captions: a text transformer trained with the UNet (GLIDE's recipe).

Each training image is captioned from its label and two measured attributes, its brightness
and its size in the frame, each split at the median of its class ("a dark small sneaker",
"a bright dress", "a boot": every attribute word kept with probability 0.75, fixed per
example), so the class does not tell the attributes: the model has to read them. A word
tokenizer is built from the captions (``WORKDIR/tokenizer.json``); a 2-layer transformer
encodes them into the context the UNet's attention blocks attend to (GLIDE's form: context
keys and values beside the image's own) and whose masked mean joins the time embedding.
Classifier-free guidance drops captions to a learned null sequence 10% of the time::

    python -m diffjax.main --config experiments/fashion_mnist_text.py --workdir runs/fmnist_text
    python -m diffjax.main --config experiments/fashion_mnist_text.py --workdir runs/fmnist_text \\
        --mode sample --config.sampler.prompts='("a dark sneaker", "a bright dress")'
    python -m diffjax.main --config experiments/fashion_mnist_text.py --workdir runs/fmnist_text \\
        --mode eval --config.eval.sweep_guidance_scales='(0, 1, 3)'

Sampling writes one grid row per prompt; eval scores how often samples have what their
prompt names (class accuracy by the feature classifier ``experiments/fmnist_features.py``,
brightness and size measured; chance 0.1 and 0.5) against the guidance scale.
``:smoke`` is a seconds-long CPU check.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        # fashion_mnist.py's data, UNet, v-prediction, DDIM-25 and CFG w = 1, conditioned on
        # captions instead of labels
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "fashion_mnist.py"))
        c.model.class_cond = False
        c.model.num_head_channels = 32
        c.model.use_scale_shift_norm = True  # the time + text embedding as FiLM (ADM)
        c.model.context_pool = "mean"  # Imagen's: masked mean of the text into the time embedding
        c.text.encoder = "transformer"
        c.text.tokenizer = "word"
        c.text.captions = "fashion_mnist_attributes"
        c.text.context_length = 8
        c.text.vocab_size = 32
        c.text.width = 64
        c.text.layers = 2
        c.text.heads = 4
        c.sampler.num_samples = 80
        c.train.num_steps = 2000
        c.train.checkpoint_every = 250
        c.train.num_sample_images = 80
        c.eval.metrics = ("class_accuracy", "attribute_accuracy")
        c.eval.num_samples = 400
        c.eval.batch_size = 200
        c.eval.nll_num_examples = 0  # nll is refused for a text model
        return c

    return configlib.with_variant(build, arg)
