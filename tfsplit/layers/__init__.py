"""Keras layers and the tensor ops they stand on, for the cut and beside it.

`bottleneck`: `MaskedEncoder` (the head's side: a convolution to C' channels and one learned gate
per channel) and `Decoder` (the tail's side: back to the backbone's width); `placement`: putting
the k channels that crossed the cut back at their indices; `local_classifier`: the device-side
classifier whose loss trains the head from the labels the device holds; `batch_norm`: averaging
batch-norm statistics across passes; `logits`: the logits under a user's model's final softmax,
which the tail outputs instead.
"""
