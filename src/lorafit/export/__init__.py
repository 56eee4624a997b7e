"""Exports of a finished adapter: a standalone merged model. May use every package below train."""
