"""Platform-neutral behaviour of the bot: imports neither telegram nor discord."""
