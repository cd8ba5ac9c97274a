"""The model's numerics: linear layers, attention, decoder layers, quantized storage, row
reductions and sampling, each computing a row the same way whatever else the step holds."""
