"""Trainers: each turns an export into a full model directory dishbot can serve, in a
subprocess of its own, reporting progress in one shape (see `bot.training.trainers.base`)."""
