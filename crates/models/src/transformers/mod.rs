pub mod transformer_2d;
pub mod transformer_temporal;
