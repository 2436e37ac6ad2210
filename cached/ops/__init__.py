"""Operations: health and metrics endpoints, the life under systemd (reload, tick, sd_notify),
logging, the reload command.
"""
