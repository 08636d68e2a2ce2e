"""The split model itself: `SplitModel`, a `keras.Model` whose `train_step` is the split step.

`split_model` holds the model (head, bottleneck, tail, wire) and its train, test and predict
steps; `nesting` is the part it owns for nested budgets (one model that serves every budget up to
the one it was trained for); `ushaped` cuts it a second time, so that the device keeps the top
and the labels; `budget` is the channel-selection math (top-k by gate importance,
masks, the budget loss, gate resets and the `Phase` a schedule is made of).
"""
