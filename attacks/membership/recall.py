"""(placeholder while the attack is written)"""
