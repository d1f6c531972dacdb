"""The two forms of a MoMos model's tensors.

- Training time (`parametrize`): a `MotifBank` per bank and a `MoMosParametrization` per tensor, on
  torch.nn.utils.parametrize; `schedule` runs refreshes from a training loop; `distributed` keeps banks
  equal across DDP / FSDP2 ranks.
- Converted (`packed`): a `MotifTable` per bank and a `PackedTensor` per tensor; `packed_tensors`,
  `members` and `dense_copy` are how the rest of momos reads a packed model.
- After convert: `calibrate` re-assigns mosaics by output error on calibration inputs, `finetune` trains the
  motif tables with the mosaics fixed.
"""
