"""Placing the sent channels in the tail's input, and what stands in for the others."""

import numpy as np
import tensorflow as tf

import tfsplit  # noqa: F401
from tfsplit.layers import placement

CHANNELS = 6


def values(batch=3, k=2, seed=0):
    return np.random.default_rng(seed).uniform(0.1, 1.0, size=(batch, 2, 2, k)).astype(np.float32)


def test_one_selection_is_placed_and_the_rest_filled():
    sent, indices = values(), np.array([4, 1], np.int32)
    fill = np.arange(CHANNELS, dtype=np.float32) / 10
    zeros = placement.place(sent, indices, CHANNELS).numpy()
    filled = placement.place(sent, indices, CHANNELS, fill).numpy()
    for got, other in ((zeros, 0.0), (filled, None)):
        np.testing.assert_allclose(got[..., 4], sent[..., 0])
        np.testing.assert_allclose(got[..., 1], sent[..., 1])
        for channel in (0, 2, 3, 5):
            expected = fill[channel] if other is None else other
            np.testing.assert_allclose(got[..., channel], expected)


def test_per_sample_selections_fill_what_each_sample_did_not_send():
    sent = values(batch=2)
    indices = np.array([[4, 1], [0, 1]], np.int32)
    fill = np.full(CHANNELS, 0.5, np.float32)
    got = placement.place(sent, indices, CHANNELS, fill).numpy()
    np.testing.assert_allclose(got[0, ..., 4], sent[0, ..., 0])
    np.testing.assert_allclose(got[1, ..., 0], sent[1, ..., 0])
    np.testing.assert_allclose(got[0, ..., 0], 0.5)  # sample 0 did not send channel 0
    np.testing.assert_allclose(got[1, ..., 4], 0.5)
    one = placement.place(sent[:1], indices[0], CHANNELS, fill)
    np.testing.assert_allclose(got[:1], one.numpy())


def test_channel_means_count_only_the_samples_that_sent_each_channel():
    sent = values(batch=2)
    means = placement.sent_channel_means(sent, np.array([4, 1]), CHANNELS).numpy()
    np.testing.assert_allclose(means[[4, 1]], sent.mean(axis=(0, 1, 2)), rtol=1e-6)
    assert not means[[0, 2, 3, 5]].any()
    per_sample = np.array([[4, 1], [0, 1]], np.int32)
    means = placement.sent_channel_means(sent, tf.constant(per_sample), CHANNELS).numpy()
    np.testing.assert_allclose(means[4], sent[0, ..., 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(means[0], sent[1, ..., 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(means[1], sent[..., 1].mean(), rtol=1e-6)
    assert not means[[2, 3, 5]].any()


def test_a_flat_cut_is_placed_the_same_way():
    sent = values(batch=2)[:, 0, 0, :]  # (N, k): a cut after a dense layer
    fill = np.full(CHANNELS, 0.5, np.float32)
    for indices in (np.array([4, 1], np.int32), np.array([[4, 1], [4, 1]], np.int32)):
        got = placement.place(sent, indices, CHANNELS, fill).numpy()
        np.testing.assert_allclose(got[:, [4, 1]], sent)
        np.testing.assert_allclose(got[:, [0, 2, 3, 5]], 0.5)
        means = placement.sent_channel_means(sent, indices, CHANNELS).numpy()
        np.testing.assert_allclose(means[[4, 1]], sent.mean(axis=0), rtol=1e-6)
